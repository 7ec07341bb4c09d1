-- The usable-impression statistics summed per (query, image, capped position), once: the input of
-- both the propensity EM (extract_position_counts.sql) and the pair weights (extract_pairs.sql).
SELECT query, image_id, least(position, $max_position) AS position,
       sum(clicks)::BIGINT AS clicks, sum(satisfied_clicks)::BIGINT AS satisfied_clicks,
       sum(impressions)::BIGINT AS impressions, min(first_seen) AS first_seen, max(last_seen) AS last_seen
FROM stats
GROUP BY ALL
