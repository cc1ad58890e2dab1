"""prepare-data: a data source into standardised, stratified train/val/test splits
(see README.md)."""
