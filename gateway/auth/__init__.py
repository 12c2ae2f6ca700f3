"""Who may call: API keys, the authentication hook, per-key rate limits and route guards."""
