"""inbox: inbound messages (unique by mailbox + Graph id), delta link per mailbox, customer
inbox state (flag, reminder hold)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01

The lead re-chains down_revision after the parallel 0003 is merged.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import comms.store.models

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('inbox_mailboxes',
    sa.Column('mailbox', sa.String(length=320), nullable=False),
    sa.Column('delta_link', sa.Text(), nullable=False),
    sa.Column('synced_at', comms.store.models.UTCDateTime(), nullable=True),
    sa.PrimaryKeyConstraint('mailbox')
    )
    op.create_table('inbound_messages',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('mailbox', sa.String(length=320), nullable=False),
    sa.Column('graph_id', sa.String(length=400), nullable=False),
    sa.Column('internet_message_id', sa.String(length=998), nullable=False),
    sa.Column('conversation_id', sa.String(length=400), nullable=False),
    sa.Column('received_at', comms.store.models.UTCDateTime(), nullable=True),
    sa.Column('from_address', sa.String(length=320), nullable=False),
    sa.Column('subject', sa.Text(), nullable=False),
    sa.Column('preview', sa.Text(), nullable=False),
    sa.Column('kind', sa.String(length=20), nullable=False),
    sa.Column('rule', sa.String(length=100), nullable=False),
    sa.Column('detail', sa.Text(), nullable=False),
    sa.Column('status_code', sa.String(length=20), nullable=False),
    sa.Column('hard', sa.Boolean(), nullable=False),
    sa.Column('address', sa.String(length=320), nullable=False),
    sa.Column('customer_id', sa.Integer(), nullable=True),
    sa.Column('message_id', sa.Integer(), nullable=True),
    sa.Column('effects', sa.Text(), nullable=False),
    sa.Column('processed_at', comms.store.models.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['customer_id'], ['customers.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('mailbox', 'graph_id', name='uq_inbound_mailbox_graph_id')
    )
    with op.batch_alter_table('inbound_messages', schema=None) as batch_op:
        batch_op.create_index('ix_inbound_kind', ['kind'], unique=False)
        batch_op.create_index('ix_inbound_address_kind', ['address', 'kind'], unique=False)
        batch_op.create_index(batch_op.f('ix_inbound_messages_conversation_id'), ['conversation_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_inbound_messages_customer_id'), ['customer_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_inbound_messages_internet_message_id'), ['internet_message_id'], unique=False)

    op.create_table('inbox_customer_state',
    sa.Column('customer_id', sa.Integer(), nullable=False),
    sa.Column('flagged', sa.Boolean(), nullable=False),
    sa.Column('flag_reason', sa.Text(), nullable=False),
    sa.Column('reminders_held_until', comms.store.models.UTCDateTime(), nullable=True),
    sa.Column('updated_at', comms.store.models.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['customer_id'], ['customers.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('customer_id')
    )


def downgrade() -> None:
    op.drop_table('inbox_customer_state')
    with op.batch_alter_table('inbound_messages', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_inbound_messages_internet_message_id'))
        batch_op.drop_index(batch_op.f('ix_inbound_messages_customer_id'))
        batch_op.drop_index(batch_op.f('ix_inbound_messages_conversation_id'))
        batch_op.drop_index('ix_inbound_kind')
        batch_op.drop_index('ix_inbound_address_kind')

    op.drop_table('inbound_messages')
    op.drop_table('inbox_mailboxes')
