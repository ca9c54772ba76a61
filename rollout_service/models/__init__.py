"""Models the project makes itself: there is no model hub on the project's machines."""
