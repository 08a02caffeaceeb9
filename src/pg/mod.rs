//! PostgreSQL side: schema and migrations, sync mode, the binary COPY encoder, the
//! throwaway cluster used by tests, the demo and the benches.
//! (Module map; the PostgreSQL helper owns this file and fills in the overview.)
