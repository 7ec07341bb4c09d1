-- One row per input impression with the first reason (if any) it cannot be used.
-- Inputs: events_raw (contract columns + filename + source_row), catalog_ids(image_id),
-- query_norms(raw_query, query, too_long), bot_sessions(session_id).
-- Parameters: $since and $until (TIMESTAMP bounds, until exclusive; NULL = open),
-- $quarantine_long (BOOLEAN).
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
    CASE
        WHEN e.query IS NULL OR n.query IS NULL OR n.query = '' THEN 'empty_query'
        WHEN e.event_ts IS NULL OR e.session_id IS NULL OR e.image_id IS NULL OR e.clicked IS NULL
            THEN 'missing_value'
        WHEN e.position IS NULL OR e.position < 1 THEN 'bad_position'
        WHEN c.image_id IS NULL THEN 'unknown_image'
        WHEN e.event_ts < $since OR e.event_ts >= $until THEN 'outside_window'
        WHEN row_number() OVER (
            PARTITION BY e.event_ts, e.session_id, e.query, e.image_id, e.position, e.clicked, e.dwell_ms
            ORDER BY e.filename, e.source_row
        ) > 1 THEN 'duplicate'
        WHEN $quarantine_long AND n.too_long THEN 'query_too_long'
        WHEN b.session_id IS NOT NULL THEN 'bot'
    END AS reason
FROM events_raw AS e
LEFT JOIN query_norms AS n ON n.raw_query = e.query
LEFT JOIN catalog_ids AS c ON c.image_id = e.image_id
LEFT JOIN bot_sessions AS b ON b.session_id = e.session_id
