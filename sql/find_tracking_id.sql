-- find_tracking_id: the id of the event with this tracking_id, or NULL. $1 uuid.
-- outbox_tracking_ids holds the event's id (0009) and created_at; rows recorded before
-- 0009 have no id, and their event is looked for in the one partition of created_at.
-- A dead letter whose partition (and tracking_id record) retention dropped is found in
-- outbox_dead_letters.
SELECT coalesce(
         (SELECT coalesce(t.id,
                          (SELECT o.id FROM outbox o
                            WHERE o.tracking_id = t.tracking_id AND o.created_at = t.created_at
                            LIMIT 1))
            FROM outbox_tracking_ids t
           WHERE t.tracking_id = $1::uuid),
         (SELECT d.id FROM outbox_dead_letters d WHERE d.tracking_id = $1::uuid))
