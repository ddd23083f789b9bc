"""Architecture families (how each maps to the IR) and the small reference models used in tests."""
