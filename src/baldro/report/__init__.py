"""`baldro report`: Markdown tables and plots from any set of run folders."""
