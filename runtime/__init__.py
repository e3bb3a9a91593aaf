"""What every zonegate program shares: config loading, serving, logging, retries, file watching."""
