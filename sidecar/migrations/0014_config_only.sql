-- Issue 14: a config may narrow its inherited providers to a list (`only`), kept as a JSON array of
-- provider names; NULL: no narrowing.
ALTER TABLE configs ADD COLUMN only_providers TEXT;
