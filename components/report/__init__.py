"""Reports the stages share: the run summary, text and Markdown tables, the self-contained
HTML report (see README.md)."""
