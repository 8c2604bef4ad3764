CREATE SEGMENT beta FROM CSV s3_beta_list;
