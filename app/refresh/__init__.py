"""The single refresh and what Powens' word about an account does to the store."""
