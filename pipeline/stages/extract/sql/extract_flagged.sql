-- Every row with a reason, whole, with its final reason: 'maybe_duplicate' resolved into
-- 'duplicate' (a later copy of a row with the same seven columns), or the row's next reason
-- ('query_too_long', 'bot'), or NULL (usable: the first copy of a duplicated row, summed into the
-- statistics by the caller).
SELECT
    event_ts, session_id, query, image_id, position, clicked, dwell_ms, source_file, source_row,
    query_norm, query_too_long, bot_session,
    CASE
        WHEN reason <> 'maybe_duplicate' THEN reason
        WHEN row_number() OVER (PARTITION BY event_ts, session_id, query, image_id, position, clicked, dwell_ms
                                ORDER BY source_file, source_row) > 1 THEN 'duplicate'
        WHEN (SELECT quarantine_long FROM classify_params) AND query_too_long THEN 'query_too_long'
        WHEN bot_session THEN 'bot'
    END AS reason
FROM classified
WHERE reason IS NOT NULL
