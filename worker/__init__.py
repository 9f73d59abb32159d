"""audience-sync: compute audiences from your own data and keep destinations in sync."""
