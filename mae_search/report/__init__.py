"""Reports regenerated from recorded trial records (results.parquet or MLflow): statistics, tables, plots,
and their Markdown, HTML and LaTeX renderings, plus the search's closing table in the terminal.
Imports ``search/``'s record, results and space only; never ``training/``, torch or Ray."""
