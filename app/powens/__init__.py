"""Powens: the HTTP client (``client``), its payloads as typed values (``models``), its errors and
connection states mapped once to the failure reasons (``errors``), reconnect links (``links``).
Knows HTTP and Powens' wire format, nothing of the database.
"""
