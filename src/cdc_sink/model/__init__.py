"""The pure core's model: ChangeEvent (events) and the Cassandra type system, i.e. the type
grammar (cql), the scalars' values (scalars), jsonb values (jsonb) and column values (values).
Imports no I/O library."""
