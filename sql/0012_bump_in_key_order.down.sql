-- Back to migration 11: keygate before 12 sends its counter update as a statement.
DROP FUNCTION keygate_bump_key_counters(uuid[], int8[], timestamptz[]);
