"""What FIP is compared against, built from the same phases and loop as FIP itself."""
