"""Indexes for a controller whose tick follows change, and jobs.run_deadline.

- ix_jobs_status_queue (status, capability, region, queued_at): queued jobs per queue
  in FIFO order: the repair's counts and a page's queue positions.
- ix_jobs_status_deadline (status, run_deadline) with the new column run_deadline
  (started_at + time_limit, set at claim): time-outs are one range scan.
- ix_jobs_status_tenant (status, tenant_id, created_at): tenants with pending jobs,
  oldest first, for fair admission.
- ix_jobs_tenant_created (tenant_id, created_at, id), ix_jobs_status_created (status,
  created_at, id): job list pages, newest first (created_at DESC, id DESC: one backward
  index scan), without sorting every job.

Running jobs get their run_deadline computed here, so none escapes its time-out.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 10:00:00

"""
from datetime import timedelta

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('run_deadline', sa.DateTime(), nullable=True))
        batch_op.create_index('ix_jobs_status_queue', ['status', 'capability', 'region', 'queued_at'],
                              unique=False)
        batch_op.create_index('ix_jobs_status_deadline', ['status', 'run_deadline'], unique=False)
        batch_op.create_index('ix_jobs_status_tenant', ['status', 'tenant_id', 'created_at'], unique=False)
        batch_op.create_index('ix_jobs_tenant_created', ['tenant_id', 'created_at', 'id'], unique=False)
        batch_op.create_index('ix_jobs_status_created', ['status', 'created_at', 'id'], unique=False)
    bind = op.get_bind()
    jobs = sa.table('jobs', sa.column('id', sa.String), sa.column('status', sa.String),
                    sa.column('started_at', sa.DateTime), sa.column('time_limit', sa.Integer),
                    sa.column('run_deadline', sa.DateTime))
    running = bind.execute(sa.select(jobs.c.id, jobs.c.started_at, jobs.c.time_limit).where(
        jobs.c.status == 'running', jobs.c.started_at.is_not(None))).all()
    for job_id, started_at, time_limit in running:
        bind.execute(jobs.update().where(jobs.c.id == job_id).values(
            run_deadline=started_at + timedelta(seconds=time_limit)))


def downgrade():
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_status_created')
        batch_op.drop_index('ix_jobs_tenant_created')
        batch_op.drop_index('ix_jobs_status_tenant')
        batch_op.drop_index('ix_jobs_status_deadline')
        batch_op.drop_index('ix_jobs_status_queue')
        batch_op.drop_column('run_deadline')
