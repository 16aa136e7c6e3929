"""What the admin shell manages besides refreshes: tenants, actors, account discovery, links."""
