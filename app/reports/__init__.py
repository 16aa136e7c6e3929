"""Per-tenant reports computed after a nightly run: summary and cashflow forecast."""
