-- The demo source: a `subscriptions` table whose history clickloop keeps (issue 7).
-- Run by `clickloop cdc up` in each database it creates (as the database's owner, over TCP).
-- REPLICA IDENTITY FULL: updates and deletes carry the whole old row in Debezium's `before`.
CREATE TABLE IF NOT EXISTS public.subscriptions (
    id           bigint PRIMARY KEY,
    user_id      text        NOT NULL,
    plan         text        NOT NULL,
    status       text        NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    cancelled_at timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE public.subscriptions REPLICA IDENTITY FULL;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'clickloop_cdc') THEN
        CREATE PUBLICATION clickloop_cdc FOR TABLE public.subscriptions;
    END IF;
END $$;
