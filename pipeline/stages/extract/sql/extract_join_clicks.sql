-- Serve's impression log (pipeline/serving/impressions.py): a click row repeats its impression with
-- clicked true and the dwell, and is joined onto the impression the same response showed
-- (request_id, image_id): one row, clicked, with the click's dwell (the longest of several clicks).
-- A click whose impression is not among the rows read (its file lost in a crash) stays a row of its
-- own, once per (request_id, image_id): the shopper saw that image at that position and clicked it.
WITH clicks AS (
    SELECT request_id, image_id, max(dwell_ms) AS click_dwell_ms
    FROM events_numbered WHERE event = 'click' AND request_id IS NOT NULL
    GROUP BY request_id, image_id
),
shown AS (
    SELECT DISTINCT request_id, image_id FROM events_numbered
    WHERE event IS DISTINCT FROM 'click' AND request_id IS NOT NULL
)
SELECT e.* REPLACE (e.clicked OR c.request_id IS NOT NULL AS clicked,
                    coalesce(c.click_dwell_ms, e.dwell_ms) AS dwell_ms)
FROM events_numbered e
LEFT JOIN clicks c ON e.request_id = c.request_id AND e.image_id = c.image_id
WHERE e.event IS DISTINCT FROM 'click'
UNION ALL BY NAME
SELECT e.* REPLACE (c.click_dwell_ms AS dwell_ms)
FROM events_numbered e
JOIN clicks c ON e.request_id = c.request_id AND e.image_id = c.image_id
WHERE e.event = 'click'
  AND NOT EXISTS (SELECT 1 FROM shown s WHERE s.request_id = e.request_id AND s.image_id = e.image_id)
QUALIFY row_number() OVER (PARTITION BY e.request_id, e.image_id ORDER BY e.filename, e.source_row) = 1
