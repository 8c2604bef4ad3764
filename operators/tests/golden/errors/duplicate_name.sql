CREATE SEGMENT vip AS plan = 'pro';

-- later, someone adds another definition
CREATE SEGMENT vip AS plan = 'enterprise';
