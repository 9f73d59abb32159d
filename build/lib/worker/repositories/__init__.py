"""Every SQL statement of the state database lives in these repository modules."""
