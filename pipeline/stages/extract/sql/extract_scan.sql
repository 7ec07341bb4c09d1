-- The one pass over the log: usable impressions summed per (day, query, image, position), and
-- every other row kept whole, in a list per group, for the quarantine file. Rows of one group
-- share their reason, so a group is either statistics or quarantine.
-- Statistics are all the propensity EM and the pair weights need, and what incremental mode keeps
-- between runs ($by_day; otherwise day is NULL and the groups are per (query, image, position),
-- far fewer). A satisfied click has a dwell of at least $satisfied_dwell_ms, or an unknown dwell.
SELECT
    reason,
    CASE WHEN $by_day THEN CAST(event_ts AS DATE) END AS day,
    query_norm,
    image_id,
    position,
    count(*) FILTER (WHERE clicked) AS clicks,
    count(*) FILTER (WHERE clicked AND (dwell_ms IS NULL OR dwell_ms >= $satisfied_dwell_ms)) AS satisfied_clicks,
    count(*) AS impressions,
    min(event_ts) AS first_seen,
    max(event_ts) AS last_seen,
    list({'event_ts': event_ts, 'session_id': session_id, 'query': query, 'image_id': image_id,
          'position': position, 'clicked': clicked, 'dwell_ms': dwell_ms, 'source_file': source_file,
          'source_row': source_row, 'query_norm': query_norm, 'query_too_long': query_too_long,
          'bot_session': bot_session, 'reason': reason}) FILTER (WHERE reason IS NOT NULL) AS flagged
FROM classified
GROUP BY reason, day, query_norm, image_id, position
