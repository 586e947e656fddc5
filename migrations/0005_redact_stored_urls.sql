-- outboxd 0005: URLs in stored errors show scheme, host and port only.
--
-- Older versions kept a webhook's path and query (where endpoints often carry their
-- credentials: ".../services/T000/B000/XXXX", "?token=...") in `last_error`, which the
-- CLI and the dead-letter API serve. Every URL in a stored error keeps its scheme, host
-- and port; the rest becomes "/…". Rows without a URL are not touched.

UPDATE outbox
   SET last_error = regexp_replace(last_error,
                                   '(https?://)(?:[^/\s?#"@]*@)?([^/\s?#"]+)[^\s"''<>()]*',
                                   '\1\2/…', 'g')
 WHERE last_error ~ 'https?://';

UPDATE outbox_redrives
   SET last_error = regexp_replace(last_error,
                                   '(https?://)(?:[^/\s?#"@]*@)?([^/\s?#"]+)[^\s"''<>()]*',
                                   '\1\2/…', 'g')
 WHERE last_error ~ 'https?://';
