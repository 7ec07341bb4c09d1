-- Hashes of the seven columns that occur more than once: every exact duplicate impression is
-- among the rows with these hashes (a few, against one aggregation over hashes alone). The scan
-- marks those rows `maybe_duplicate`; they are confirmed on the columns themselves afterwards, so
-- a hash collision never quarantines a row.
SELECT hash(event_ts, session_id, query, image_id, position, clicked, dwell_ms) AS h
FROM events_raw
GROUP BY h
HAVING count(*) > 1
