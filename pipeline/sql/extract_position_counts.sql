-- Usable impressions aggregated by (pair, capped position) for the propensity EM; only pairs with
-- enough impressions, seen at two or more positions, carry information about position bias.
WITH counts AS (
    SELECT query_norm, image_id, least(position, $max_position) AS position,
           count(*) FILTER (WHERE clicked) AS clicks, count(*) AS impressions
    FROM classified
    WHERE reason IS NULL
    GROUP BY query_norm, image_id, least(position, $max_position)
),
informative AS (
    SELECT query_norm, image_id, dense_rank() OVER (ORDER BY query_norm, image_id) - 1 AS pair
    FROM counts
    GROUP BY query_norm, image_id
    HAVING sum(impressions) >= $min_pair_impressions AND count(*) >= 2
)
SELECT i.pair, c.position, c.clicks, c.impressions
FROM counts AS c
JOIN informative AS i USING (query_norm, image_id)
