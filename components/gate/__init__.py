"""gate: one record that says whether the chosen variant may be deployed, and why
(see README.md)."""
