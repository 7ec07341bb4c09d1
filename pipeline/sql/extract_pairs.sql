-- Aggregate usable impressions into (query, image) pairs.
-- weight = clicks for now (raw weighting); the examination-debiased weights come with issue 3.
SELECT
    k.query_norm AS query,
    k.image_id,
    any_value(c.product_id) AS product_id,
    sum(k.clicked::INTEGER)::BIGINT AS clicks,
    count(*) AS impressions,
    sum(k.clicked::INTEGER)::DOUBLE AS weight,
    min(k.event_ts) AS first_seen,
    max(k.event_ts) AS last_seen
FROM classified AS k
JOIN catalog_ids AS c USING (image_id)
WHERE k.reason IS NULL
GROUP BY k.query_norm, k.image_id
ORDER BY query, image_id
