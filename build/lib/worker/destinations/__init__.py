"""Destinations: where identify calls are delivered (file, Ortto, Ortto REST API, Segment)."""
