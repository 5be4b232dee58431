"""PostgreSQL: schema migrations (``migrate``), and the one data-access ``Store``."""
