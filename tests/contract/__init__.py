"""Tests of the v1 contract itself: generated stubs, presence, enums, comments, buf lint."""
