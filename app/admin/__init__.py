"""What the admin shell manages besides refreshes: tenants and actors (``manage``), account
discovery (``accounts``), Powens users linked, unlinked and listed (``powens_users``), reconnect
links (``connections``), the retention policy applied now and audited (``retention``), and the
shell's operations with their auth levels (``operations``).

May import: the foundation modules, ``app.powens``, ``app.store``, ``app.refresh``, ``app.ops``.
"""
