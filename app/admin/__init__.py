"""What the admin shell manages besides refreshes: tenants and actors (``manage``), account
discovery and Powens user linking (``accounts``), reconnect links (``connections``), and the shell's
operations with their auth levels (``operations``).

May import: the foundation modules, ``app.powens``, ``app.store``, ``app.refresh``, ``app.ops``.
"""
