"""Agent incarnations and graceful stops.

``agents.incarnation``: the agent's current start; ``agents.stopped_at``: a graceful
stop announced by the agent; ``jobs.incarnation``: the start that claimed the attempt.
All nullable: existing rows need no value.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 09:50:00.000000

"""
import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('agents', schema=None) as batch_op:
        batch_op.add_column(sa.Column('incarnation', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('stopped_at', sa.DateTime(), nullable=True))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('incarnation', sa.String(length=64), nullable=True))


def downgrade():
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('incarnation')
    with op.batch_alter_table('agents', schema=None) as batch_op:
        batch_op.drop_column('stopped_at')
        batch_op.drop_column('incarnation')
