-- One row per input impression with the first reason (if any) it cannot be used. A view, read
-- once by extract_scan.sql, never materialised.
-- Inputs: events_raw (contract columns + filename + source_row), catalog_ids(image_id),
-- query_norms(raw_query, query, too_long), session_flags(session_id, bot, repeats_a_row),
-- classify_params(since, until, quarantine_long): since and until are TIMESTAMP bounds (until
-- exclusive). A view cannot hold bound parameters, so they come from that one-row table.
-- 'maybe_duplicate' (a row of a session that repeats a row) is provisional: pipeline.extract resolves it into 'duplicate' (a later copy),
-- or the row's next reason ('query_too_long', 'bot'), or usable.
SELECT
    e.event_ts,
    e.session_id,
    e.query,
    e.image_id,
    e.position,
    e.clicked,
    e.dwell_ms,
    e.filename AS source_file,
    e.source_row,
    n.query AS query_norm,
    coalesce(n.too_long, false) AS query_too_long,
    coalesce(f.bot, false) AS bot_session,
    CASE
        -- first: a row outside the window is not this run's to judge (extract counts it apart, never
        -- as quarantined), as if its partition had not been read
        WHEN e.event_ts < p.since OR e.event_ts >= p.until THEN 'outside_window'
        WHEN e.query IS NULL OR n.query IS NULL OR n.query = '' THEN 'empty_query'
        WHEN e.event_ts IS NULL OR e.session_id IS NULL OR e.image_id IS NULL OR e.clicked IS NULL
            THEN 'missing_value'
        WHEN e.position IS NULL OR e.position < 1 THEN 'bad_position'
        WHEN c.image_id IS NULL THEN 'unknown_image'
        WHEN f.repeats_a_row THEN 'maybe_duplicate'
        WHEN p.quarantine_long AND n.too_long THEN 'query_too_long'
        WHEN f.bot THEN 'bot'
    END AS reason
FROM events_raw AS e
CROSS JOIN classify_params AS p
LEFT JOIN query_norms AS n ON n.raw_query = e.query
LEFT JOIN catalog_ids AS c ON c.image_id = e.image_id
LEFT JOIN session_flags AS f ON f.session_id = e.session_id
