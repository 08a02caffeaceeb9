//! PostgreSQL side: schema, migrations, sync mode, the throwaway test cluster.
