"""sagan."""
