"""Everything that talks SQL to the shared VICIdial database lives in this package."""
