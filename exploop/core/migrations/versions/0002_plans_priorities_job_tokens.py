"""Plans, priorities, scoped job tokens, bootstrap token constraints.

Existing rows get the defaults a new row would: plan "starter", priority "normal",
and an admission key equal to the job's creation time (normal priority's offset
is the same for every old job, so their order is kept).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 11:46:59.162355

"""
import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('bootstrap_tokens', schema=None) as batch_op:
        batch_op.add_column(sa.Column('revoked_by', sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column('revoke_reason', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('description', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('region', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('capabilities', sa.String(length=100), nullable=True))

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('priority', sa.String(length=16), nullable=False,
                                      server_default='normal'))
        batch_op.add_column(sa.Column('admission_key', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('job_token_hash', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('job_token_expires_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('cancelled_by', sa.String(length=100), nullable=True))
    op.execute("UPDATE jobs SET admission_key = created_at")
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.alter_column('priority', server_default=None)
        batch_op.alter_column('admission_key', existing_type=sa.DateTime(), nullable=False)
        batch_op.drop_index(batch_op.f('ix_jobs_tenant_status'))
        batch_op.create_index('ix_jobs_tenant_status', ['tenant_id', 'status', 'admission_key'], unique=False)

    with op.batch_alter_table('tenants', schema=None) as batch_op:
        batch_op.add_column(sa.Column('plan', sa.String(length=32), nullable=False, server_default='starter'))
    with op.batch_alter_table('tenants', schema=None) as batch_op:
        batch_op.alter_column('plan', server_default=None)



def downgrade():
    with op.batch_alter_table('tenants', schema=None) as batch_op:
        batch_op.drop_column('plan')

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_tenant_status')
        batch_op.create_index(batch_op.f('ix_jobs_tenant_status'), ['tenant_id', 'status'], unique=False)
        batch_op.drop_column('cancelled_by')
        batch_op.drop_column('job_token_expires_at')
        batch_op.drop_column('job_token_hash')
        batch_op.drop_column('admission_key')
        batch_op.drop_column('priority')

    with op.batch_alter_table('bootstrap_tokens', schema=None) as batch_op:
        batch_op.drop_column('capabilities')
        batch_op.drop_column('region')
        batch_op.drop_column('description')
        batch_op.drop_column('revoke_reason')
        batch_op.drop_column('revoked_by')

