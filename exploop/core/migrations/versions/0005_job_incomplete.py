"""jobs.incomplete_json: the lockfiles a completed job could not check, and why.

NULL for every existing row: nothing said a job was incomplete before this column.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 10:00:00

"""
import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('incomplete_json', sa.Text(), nullable=True))


def downgrade():
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('incomplete_json')
