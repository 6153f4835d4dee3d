-- LogIDs in OrderCloud's GUID form are keyed by their 16 bytes instead of their 36 characters
-- (src/store/sqlite/seen.rs, SeenKey): convert the keys stored before. Other keys (LogIDs in
-- another form, sha256: keys of webhooks without one) stay text. OR IGNORE: a GUID stored twice in
-- different letter cases keeps one key of each type (the text one ages out).
UPDATE OR IGNORE seen_webhooks
SET dedupe_key = unhex(replace(dedupe_key, '-', ''))
WHERE typeof(dedupe_key) = 'text'
  AND length(dedupe_key) = 36
  AND dedupe_key GLOB '[0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f]-[0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f]-[0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f]-[0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f]-[0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f]';
