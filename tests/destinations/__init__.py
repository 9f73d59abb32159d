"""Tests of the destination clients against the local fake destinations server."""
