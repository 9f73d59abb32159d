"""Rule audiences: a grammar of conditions on events and traits, compiled to SQL."""
