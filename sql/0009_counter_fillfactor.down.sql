-- Back to the default fillfactor (100) for the counter tables. Pages already written
-- half full stay so until they are rewritten.
ALTER TABLE api_keys RESET (fillfactor);
ALTER TABLE rate_limit_tracking RESET (fillfactor);
