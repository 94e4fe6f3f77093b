"""Image sets, transforms, noise and the bundled demo data."""
