"""Tables and plots built from the results store."""
