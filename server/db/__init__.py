"""PostgreSQL access: engine factories, tables, repository functions, migrations."""
