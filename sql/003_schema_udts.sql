-- The fields of every UDT a target table's columns use, {"name": [["field", "type"], ...]}, so
-- that a restarted worker rebuilds exactly the column types it created the table with (the
-- type text alone names a UDT but not its fields). NULL in versions recorded before this.
ALTER TABLE _cdc_schema_metadata ADD COLUMN IF NOT EXISTS udts jsonb;
