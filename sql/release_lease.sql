-- release_lease: gives up the named job's lease if $2 holder still holds it. $1 name text.
DELETE FROM outbox_leases WHERE name = $1::text AND holder = $2::text
